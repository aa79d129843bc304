"""Unit tests for common.digest: segment and whole-model digests."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import xxhash

from common.digest import (
    SegmentHasher,
    segment_count,
    segment_digest,
    segment_range,
    whole_digest,
)

EMPTY_XXH3_64 = "2d06800538d394c2"  # xxh3_64 of b""


def _expected(data: bytes, segment_bytes: int) -> list[str]:
    """Reference: xxh3_64 over each segment slice, computed independently."""
    if not data:
        return [xxhash.xxh3_64(b"").hexdigest()]
    return [
        xxhash.xxh3_64(data[i : i + segment_bytes]).hexdigest()
        for i in range(0, len(data), segment_bytes)
    ]


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, k = [], 0, 0
    while pos < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[pos : pos + n])
        pos += n
        k += 1
    return out


DATA = np.random.default_rng(1234).integers(0, 256, size=1000, dtype=np.uint8).tobytes()


def test_empty_digest_constant() -> None:
    assert segment_digest(b"") == EMPTY_XXH3_64
    assert xxhash.xxh3_64(b"").hexdigest() == EMPTY_XXH3_64


def test_segment_digest_matches_xxh3_64() -> None:
    assert segment_digest(DATA) == xxhash.xxh3_64_hexdigest(DATA)
    assert segment_digest(memoryview(DATA)[10:90]) == xxhash.xxh3_64_hexdigest(DATA[10:90])
    assert len(segment_digest(DATA)) == 16
    assert segment_digest(DATA[:-1]) != segment_digest(DATA)


@pytest.mark.parametrize(
    "sizes",
    [[1], [7, 64, 1, 200, 3, 129], [64], [63], [65], [1000], [5000]],
    ids=["1-byte", "uneven", "aligned", "63", "65", "whole", "bigger-than-data"],
)
@pytest.mark.parametrize("segment_bytes", [1, 64, 100, 999, 1000, 1001, 4096])
def test_hasher_any_chunking(sizes: list[int], segment_bytes: int) -> None:
    h = SegmentHasher(segment_bytes)
    for c in _chunks(DATA, sizes):
        h.feed(c)
    got = h.finish()
    assert got == _expected(DATA, segment_bytes)
    assert len(got) == segment_count(len(DATA), segment_bytes)


def test_hasher_uneven_segment_known_count() -> None:
    h = SegmentHasher(64)
    h.feed(DATA)
    got = h.finish()
    assert len(got) == 16  # 15 full segments of 64 bytes + 40 bytes
    assert got[-1] == xxhash.xxh3_64_hexdigest(DATA[960:])


def test_hasher_exact_multiple_has_no_trailing_empty_segment() -> None:
    data = DATA[:960]
    h = SegmentHasher(64)
    for c in _chunks(data, [5, 59, 64, 1]):
        h.feed(c)
    got = h.finish()
    assert len(got) == 15
    assert EMPTY_XXH3_64 not in got
    assert got == _expected(data, 64)


def test_hasher_empty_stream_gives_one_empty_segment() -> None:
    h = SegmentHasher(64)
    assert h.finish() == [EMPTY_XXH3_64]


def test_hasher_empty_feeds_are_ignored() -> None:
    h = SegmentHasher(10)
    h.feed(b"")
    h.feed(DATA[:10])
    h.feed(b"")
    h.feed(memoryview(b""))
    assert h.finish() == [xxhash.xxh3_64_hexdigest(DATA[:10])]


def test_hasher_accepts_typed_and_multidimensional_memoryviews() -> None:
    arr = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    raw = arr.tobytes()
    h = SegmentHasher(48)
    h.feed(arr[:1].data)  # a memoryview of format 'f', 3-D
    h.feed(arr[1:].data)
    assert h.finish() == _expected(raw, 48)


def test_hasher_digests_attribute_grows_as_segments_complete() -> None:
    h = SegmentHasher(4)
    h.feed(b"abc")
    assert h.digests == []
    h.feed(b"defgh")
    assert h.digests == [xxhash.xxh3_64_hexdigest(b"abcd"), xxhash.xxh3_64_hexdigest(b"efgh")]
    h.feed(b"ij")
    assert h.finish() == [
        xxhash.xxh3_64_hexdigest(b"abcd"),
        xxhash.xxh3_64_hexdigest(b"efgh"),
        xxhash.xxh3_64_hexdigest(b"ij"),
    ]


def test_whole_digest_is_xxh3_128_of_joined_digests() -> None:
    segs = _expected(DATA, 100)
    assert whole_digest(segs) == xxhash.xxh3_128_hexdigest("\n".join(segs).encode("ascii"))
    assert len(whole_digest(segs)) == 32


def test_whole_digest_depends_on_order_and_content() -> None:
    segs = _expected(DATA, 100)
    assert whole_digest(segs) != whole_digest(list(reversed(segs)))
    swapped = [segs[1], segs[0], *segs[2:]]
    assert whole_digest(segs) != whole_digest(swapped)
    assert whole_digest(segs) != whole_digest(segs[:-1])
    assert whole_digest(segs) == whole_digest(tuple(segs))


@pytest.mark.parametrize(
    ("total", "seg", "count"),
    [
        (0, 64, 1),
        (1, 64, 1),
        (63, 64, 1),
        (64, 64, 1),
        (65, 64, 2),
        (128, 64, 2),
        (129, 64, 3),
        (1000, 1, 1000),
        (10, 1000, 1),
    ],
)
def test_segment_count(total: int, seg: int, count: int) -> None:
    assert segment_count(total, seg) == count


@pytest.mark.parametrize(
    ("index", "total", "seg", "rng"),
    [
        (0, 0, 64, (0, 0)),
        (0, 10, 64, (0, 10)),
        (0, 128, 64, (0, 64)),
        (1, 128, 64, (64, 128)),
        (2, 130, 64, (128, 130)),
        (1, 129, 64, (64, 128)),
    ],
)
def test_segment_range(index: int, total: int, seg: int, rng: tuple[int, int]) -> None:
    assert segment_range(index, total, seg) == rng


@pytest.mark.parametrize(("total", "seg"), [(0, 8), (1, 8), (8, 8), (9, 8), (1000, 64), (960, 64)])
def test_segment_ranges_tile_the_file(total: int, seg: int) -> None:
    ranges = [segment_range(i, total, seg) for i in range(segment_count(total, seg))]
    assert ranges[0][0] == 0
    assert ranges[-1][1] == total
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start
    assert all(0 < e - s <= seg for s, e in ranges) or total == 0
