"""Pure helpers for the benchmark report: medians with their spread, throughput ratios, tables.

No I/O here, so tests/unit can check them without root, a kernel or a database.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float
    n: int

    def fmt(self, fmt: str = "{:.0f}", unit: str = "") -> str:
        """"12 ms (10-15)" for several runs, "12 ms" for one."""
        mid = fmt.format(self.median) + unit
        if self.n < 2 or fmt.format(self.lo) == fmt.format(self.hi):
            return mid
        return f"{mid} ({fmt.format(self.lo)}-{fmt.format(self.hi)})"


def median(values: Iterable[float | None]):
    """The middle of the values that are not None (the upper one of an even count: a value that
    was measured); None when there are none."""
    vals = sorted(v for v in values if v is not None)
    return vals[len(vals) // 2] if vals else None


def spread(values: Iterable[float | None]) -> Spread | None:
    """Median, min and max of the values that are not None; None when there are none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return Spread(statistics.median(vals), min(vals), max(vals), len(vals))


def windowed_tps(progress: Sequence[tuple[float, float]], start: float, end: float) -> float | None:
    """Mean throughput over [start, end) from pgbench -P 1 lines (second-end time, tps).

    A second pgbench did not report (all clients gone, pgbench exited) counts as zero: a
    server that crashed did no work, and averaging only the lines that exist would hide it.
    """
    if end - start < 1:
        return None
    inside = [tps for t, tps in progress if start < t <= end]
    seconds = int(end - start)
    return sum(inside[:seconds]) / seconds


def ratio(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return part / whole


def count_true(values: Iterable[bool | None]) -> tuple[int, int]:
    """(how many are True, how many are not None)."""
    vals = [v for v in values if v is not None]
    return sum(1 for v in vals if v), len(vals)


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def fmt_spread(values: Iterable[float | None], fmt: str = "{:.0f}", unit: str = "", none: str = "–") -> str:
    s = spread(values)
    return none if s is None else s.fmt(fmt, unit)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed and pipes escaped."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def interleave(contenders: Sequence[str], repeats: int) -> list[tuple[int, str]]:
    """(round, contender) in the order A B C A B C ...: drift on the machine hits all alike."""
    return [(r, c) for r in range(repeats) for c in contenders]
