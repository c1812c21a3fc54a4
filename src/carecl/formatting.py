"""How numbers are written for people: durations and values that may be missing (NaN / None)."""

from __future__ import annotations

import math

MISSING = "n/a"


def is_missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_number(value: float | None, spec: str = ".2f", missing: str = MISSING) -> str:
    """`value` formatted with `spec`, or `missing` for None / NaN."""
    return missing if is_missing(value) else format(value, spec)


def format_clock(seconds: float) -> str:
    """H:MM:SS, for progress lines and ETAs."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def format_duration(seconds: float | None) -> str:
    """12.3 s / 4 min 05 s / 2 h 07 min, for reports."""
    if is_missing(seconds):
        return MISSING
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
