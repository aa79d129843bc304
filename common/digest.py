"""Digests for segments and whole models (xxh3: fast enough to run at line rate).

A model's whole digest is the xxh3-128 of its segment digests in order, so a receiver
that verified every segment on arrival knows the whole digest without reading the file
again, and a resumed transfer only re-hashes the segments it re-moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import xxhash

# the cut of a file into segments lives with the rest of the segment protocol; these
# names stay importable from here for the code that hashes segments
from common.segments import segment_count, segment_range

__all__ = [
    "SegmentHasher",
    "segment_count",
    "segment_digest",
    "segment_range",
    "whole_digest",
]


def segment_digest(data: bytes | memoryview) -> str:
    return str(xxhash.xxh3_64_hexdigest(data))


def whole_digest(segment_digests: Sequence[str]) -> str:
    return str(xxhash.xxh3_128_hexdigest("\n".join(segment_digests).encode("ascii")))


class SegmentHasher:
    """Hashes a byte stream fed in any chunking into per-segment digests."""

    def __init__(self, segment_bytes: int) -> None:
        self._segment_bytes = segment_bytes
        self._hasher = xxhash.xxh3_64()
        self._filled = 0
        self.digests: list[str] = []

    def feed(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            take = min(view.nbytes, self._segment_bytes - self._filled)
            self._hasher.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == self._segment_bytes:
                self._cut()

    def _cut(self) -> None:
        self.digests.append(self._hasher.hexdigest())
        self._hasher.reset()
        self._filled = 0

    def finish(self) -> list[str]:
        if self._filled or not self.digests:
            self._cut()
        return self.digests
