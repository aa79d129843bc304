"""Sizes, rates and durations as people read them in logs and terminals.

Binary units throughout (MiB, MiB/s), so that a size and the rate that moves it use
the same unit and a reader can divide one by the other in their head.
"""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``; bytes below 1 KiB stay whole."""
    value = float(n)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"


def rate(bytes_per_s: float | None) -> str:
    """``None`` (not known yet) -> ``-``; otherwise a size per second."""
    if bytes_per_s is None:
        return "-"
    return size(bytes_per_s) + "/s"


def duration(seconds: float | None) -> str:
    """``None`` -> ``-``; ``0.25`` -> ``0.2 s``; ``42.4`` -> ``42 s``; ``3725`` -> ``1:02:05``."""
    if seconds is None:
        return "-"
    if seconds < 9.95:
        return f"{max(0.0, seconds):.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def percent(done: int, total: int) -> str:
    if total <= 0:
        return "-"
    return f"{100 * done // total}%"


def progress(done: int, total: int) -> str:
    """``12.0 MiB / 64.0 MiB (18%)``; ``-`` when the total is not known."""
    if total <= 0:
        return "-"
    return f"{size(done)} / {size(total)} ({percent(done, total)})"
