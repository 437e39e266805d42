"""Slurm's time formats and human durations, parsed by pure functions."""

from __future__ import annotations

import re

_UNLIMITED = {"UNLIMITED", "INFINITE", "NOT_SET", "N/A", "NONE"}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_slurm_time(text: str) -> int | None:
    """Seconds of a Slurm time limit or time-left value; None means unlimited.

    Accepts every form Slurm prints or takes: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`,
    `D-HH:MM`, `D-HH:MM:SS`, and `UNLIMITED`/`INFINITE`. Raises ValueError otherwise.
    """
    value = text.strip()
    if value.upper() in _UNLIMITED:
        return None
    days = 0
    if "-" in value:
        day_text, _, value = value.partition("-")
        if not day_text.isdigit() or not value:
            raise ValueError(f"invalid Slurm time {text!r}")
        days = int(day_text)
        parts = value.split(":")
        if len(parts) > 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"invalid Slurm time {text!r}")
        hours, minutes, seconds = ([int(p) for p in parts] + [0, 0])[:3]
    else:
        parts = value.split(":")
        if not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"invalid Slurm time {text!r}")
        numbers = [int(p) for p in parts]
        if len(numbers) == 1:
            hours, minutes, seconds = 0, numbers[0], 0
        elif len(numbers) == 2:
            hours, minutes, seconds = 0, numbers[0], numbers[1]
        else:
            hours, minutes, seconds = numbers
    if (minutes >= 60 and (days or hours)) or seconds >= 60:
        raise ValueError(f"invalid Slurm time {text!r}")
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def format_slurm_time(seconds: int) -> str:
    """The `D-HH:MM:SS` form sbatch accepts for --time (rounded up to whole seconds)."""
    if seconds < 0:
        raise ValueError("negative time")
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"


def parse_duration(text: str) -> float:
    """Seconds of a human duration such as `30s`, `10m`, `1.5h`, `2d` or a Slurm time."""
    match = _DURATION.match(text)
    if match:
        return float(match.group(1)) * _UNITS[match.group(2)]
    try:
        seconds = parse_slurm_time(text)
    except ValueError:
        raise ValueError(f"invalid duration {text!r} (use e.g. 30s, 10m, 1h or H:MM:SS)") from None
    if seconds is None:
        raise ValueError("a duration must be finite")
    return float(seconds)
