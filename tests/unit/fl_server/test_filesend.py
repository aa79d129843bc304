"""Range headers the model route answers, and the ones it refuses by name."""

from __future__ import annotations

import pytest

from common.errors import RangeNotSatisfiable
from fl_server.filesend import parse_range


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (None, None),
        ("bytes=0-99", (0, 100)),
        ("bytes=10-", (10, 1000)),
        ("bytes=-100", (900, 1000)),
        ("bytes=-5000", (0, 1000)),
        ("bytes=990-5000", (990, 1000)),
        (" bytes=0-0 ", (0, 1)),
    ],
)
def test_ranges(header: str | None, want: tuple[int, int] | None) -> None:
    assert parse_range(header, 1000) == want


@pytest.mark.parametrize(
    ("header", "words"),
    [
        ("bytes=1000-", "outside the file of 1000 bytes"),
        ("bytes=5-4", "outside"),
        ("bytes=-0", "outside"),
        ("bytes=0-1,5-6", "one range"),
        ("items=0-1", "one range"),
        ("bytes=-", "one range"),
        ("bytes=a-b", "one range"),
    ],
)
def test_bad_ranges_are_named(header: str, words: str) -> None:
    with pytest.raises(RangeNotSatisfiable, match=words) as err:
        parse_range(header, 1000)
    assert err.value.http_status == 416 and err.value.field == "Range"
