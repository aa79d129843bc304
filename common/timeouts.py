"""The four timeouts of the reference deployment, and the progress timer behind them.

All of them are *progress* timeouts: they fire only after a whole period in which
nothing moved, never because a transfer is merely long. A 128 GB upload at 10 MB/s takes
3.5 hours and must succeed with the defaults; a connection on which no byte moved for
``communication_timeout`` seconds is dead and fails with a message naming the stage.

``communication_timeout`` covers one request/response in three stages, each with its
own timer of this length: SENDING (restarts whenever bytes were written), WAITING (after
the last byte was sent, until the first byte of the answer: the remote may need long to
prepare), RECEIVING (restarts whenever bytes arrived). ``streaming_ack_wait`` replaces
the WAITING stage for a segment upload, whose answer is the segment's acknowledgement.
``streaming_read_timeout`` bounds how long a received chunk may wait to be taken by the
layer above (the disk writer). ``train_timeout`` belongs to the job: it is how long the
controller waits, without progress on a task, for that task's result.
"""

from __future__ import annotations

import asyncio
import enum
from types import TracebackType
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat

from common.errors import TransferTimeout

DEFAULT_COMMUNICATION_TIMEOUT_S = 300.0
DEFAULT_STREAMING_ACK_WAIT_S = 300.0
DEFAULT_STREAMING_READ_TIMEOUT_S = 300.0
DEFAULT_TRAIN_TIMEOUT_S = 3600.0


class Timeouts(BaseModel):
    """Transfer timeouts shared by server and client; ``null`` in YAML means no limit."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    communication_timeout: PositiveFloat | None = Field(
        DEFAULT_COMMUNICATION_TIMEOUT_S,
        description=(
            "Seconds. Each of the three stages of one request/response (sending, waiting "
            "for the remote's first byte, receiving) fails only after this long without "
            "any progress. A slow transfer that keeps moving never hits it."
        ),
    )
    streaming_ack_wait: PositiveFloat | None = Field(
        DEFAULT_STREAMING_ACK_WAIT_S,
        description=(
            "Seconds. How long a sender waits, after the last byte of one segment, for "
            "the receiver's acknowledgement of that segment. Sites send the segments that "
            "wait for one (uploads); the server accepts the key so that one timeouts: "
            "block fits every role, but sends nothing that waits for an acknowledgement."
        ),
    )
    streaming_read_timeout: PositiveFloat | None = Field(
        DEFAULT_STREAMING_READ_TIMEOUT_S,
        description=(
            "Seconds. How long a received chunk may wait to be taken by the layer above "
            "(the disk writer) before the stream is declared stuck."
        ),
    )


class Stage(enum.Enum):
    SENDING = "sending"
    WAITING = "waiting for the first byte of the answer"
    RECEIVING = "receiving"


class _Keep(enum.Enum):
    """Type of ``KEEP``: an enum so that ``is KEEP`` narrows the type for mypy."""

    KEEP = "keep"


KEEP: Final = _Keep.KEEP
"""Passed to ``ProgressTimer.enter`` to keep the current period.

A sentinel and not ``None``, because ``None`` already means "no limit" everywhere else
(YAML ``null``, ``Timeouts``), and a caller forwarding such a setting must get exactly
that.
"""


class ProgressTimer:
    """An ``asyncio.timeout`` scope that fires only after ``period_s`` without progress.

    ``progress(n)`` is called per chunk and costs one float store; the timer callback
    re-arms itself from the last progress time instead of rescheduling per chunk.
    ``enter(stage, period_s)`` switches stage and restarts the clock; ``period_s`` is
    a number of seconds, ``None`` for no limit, or ``KEEP`` (the default) to go on with
    the current period. On expiry the body is cancelled and ``TransferTimeout`` names
    the stage, the peer and the bytes.
    """

    def __init__(self, period_s: float | None, *, stage: Stage, peer: str, what: str) -> None:
        self._period_s = period_s
        self.stage = stage
        self.peer = peer
        self.what = what
        self.bytes_moved = 0
        self._loop = asyncio.get_running_loop()
        self._last = self._loop.time()
        self._scope: asyncio.Timeout | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._fired_stage: Stage | None = None

    def progress(self, nbytes: int = 0) -> None:
        self.bytes_moved += nbytes
        self._last = self._loop.time()

    def enter(self, stage: Stage, period_s: float | _Keep | None = KEEP) -> None:
        """Start a new stage, optionally with its own period (e.g. the ack wait).

        ``None`` switches the timer off for this stage, so that a ``null`` setting passed
        through unchanged means no limit; ``KEEP`` leaves the period as it is.
        """
        self.stage = stage
        if period_s is not KEEP:
            self._period_s = period_s
        self._last = self._loop.time()
        self._arm()

    def _arm(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._period_s is not None and self._scope is not None:
            self._handle = self._loop.call_at(self._last + self._period_s, self._check)

    def _check(self) -> None:
        self._handle = None
        assert self._period_s is not None and self._scope is not None
        if self._loop.time() - self._last >= self._period_s:
            self._fired_stage = self.stage
            self._scope.reschedule(self._loop.time())
        else:
            self._arm()

    async def __aenter__(self) -> ProgressTimer:
        self._scope = asyncio.timeout(None)
        await self._scope.__aenter__()
        self._last = self._loop.time()
        self._arm()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
        assert self._scope is not None
        try:
            await self._scope.__aexit__(exc_type, exc, tb)
        except TimeoutError as err:
            stage = self._fired_stage or self.stage
            raise TransferTimeout(
                f"{self.what} with {self.peer}: no progress for {self._period_s:g} s while "
                f"{stage.value} after {self.bytes_moved} bytes; the peer or the network "
                "stalled (raise the timeout only if it is really this slow)"
            ) from err
