"""Parse and format byte sizes ("1.5GiB", "200MB", "60%"), and decimal numbers from the outside world."""

from __future__ import annotations

import re

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3, "ti": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from an int or a string such as "1.5GiB", "200MB" or "4096"."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    m = _SIZE.match(text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as '512MiB' or '1.5GB', got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_budget(text: str | int, available: int) -> int:
    """A memory budget in bytes: a percentage of ``available`` ("60%") or an absolute size."""
    if isinstance(text, str) and text.strip().endswith("%"):
        try:
            pct = float(text.strip()[:-1])
        except ValueError:
            raise ValueError(f"expected a percentage such as '60%', got {text!r}") from None
        if not 0 < pct <= 100:
            raise ValueError(f"percentage must be in (0, 100], got {text!r}")
        return int(available * pct / 100)
    return parse_size(text)


def format_size(n: int | float | None) -> str:
    """A short human size: 1.5 GiB, 31.0 MiB, 512 B."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|min|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int) -> float:
    """Seconds from a number or a string such as "90s", "10m", "1.5h" or "250ms"."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"a duration must not be negative, got {text}")
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise ValueError(f"expected a duration such as '90s', '10m' or '1h', got {text!r}")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def format_duration(seconds: float | None) -> str:
    """A short human duration: 850ms, 42s, 3m05s, 2h10m."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def decimal(text: str, max_digits: int = 19) -> int | None:
    """A non-negative integer written in ASCII digits (at most ``max_digits``), else None.

    ``str.isdigit()`` alone takes '³' and '١', which ``int()`` refuses or reads as another number.
    """
    text = text.strip()
    if not text or not text.isascii() or not text.isdigit() or len(text) > max_digits:
        return None
    return int(text)
