"""The one pressure judgment: from one MemoryReading, how pressed the watched scope is.

Everything that asks "how bad is it?" reads an Assessment made here: the policy (which
answers to take), the re-check right before each kill (a fresh reading, judged the same
way), the level metric and the audit record of a level change. Pure, but for the level's
memory (LevelState), which the daemon owns and hands in.

Levels are entered at once and left only below their marks minus the hysteresis, after
min_dwell seconds; a level merely held that way is not pressure "now" (`pressed`), so no
cache is shrunk and nothing is killed for it.
"""
from __future__ import annotations

from dataclasses import dataclass

from .settings import Pressure
from .model import Level, MemoryReading

# A scope this close to its limit (page cache included) is being reclaimed on every charge.
AT_LIMIT = 0.98


def _pct(x: float) -> str:
    return f"{x * 100:.0f}%"


def judge(m: MemoryReading, p: Pressure, margin: float = 0.0) -> tuple[Level, str]:
    """The level one reading justifies, with every mark lowered by `margin` (hysteresis), and why.

    On cgroup v1 PSI is host-wide: it may raise the watched cgroup to warn (shrinking caches
    is cheap), but only the cgroup's own figures may justify killing in it.
    """
    r = m.unreclaimable_ratio
    own_psi = m.cgroup_version != 1
    psi_margin = margin * 100          # the same hysteresis, in PSI percentage points
    where = "of the limit" if m.cgroup else "of RAM"
    if m.pending_bytes:
        where += f" (with {m.pending_bytes // 2**20} MiB the sessions have allocated and not yet touched)"
    if m.limit_bytes and r >= p.critical_usage - margin:
        return Level.CRITICAL, f"unreclaimable usage {_pct(r)} {where} >= critical mark {_pct(p.critical_usage)}"
    if m.limit_bytes and r >= p.high_usage - margin:
        return Level.HIGH, f"unreclaimable usage {_pct(r)} {where} >= high mark {_pct(p.high_usage)}"
    if own_psi and p.high_psi_full > 0 and m.psi_full_avg10 >= p.high_psi_full - psi_margin:
        return Level.HIGH, f"PSI full avg10 {m.psi_full_avg10:.1f}% >= high mark {p.high_psi_full:g}%"
    if _stalled_at_limit(m, p, margin):
        return Level.HIGH, (f"at the limit ({_pct(m.usage_ratio)} with page cache) and IO pressure some "
                            f"{m.io_some_avg10:.1f}% >= high mark {p.high_io_some:g}%: its page cache is "
                            "waiting to be written, not free to reclaim")
    if m.limit_bytes and r >= p.warn_usage - margin:
        return Level.WARN, f"unreclaimable usage {_pct(r)} {where} >= warn mark {_pct(p.warn_usage)}"
    if p.warn_psi_some > 0 and m.psi_some_avg10 >= p.warn_psi_some - psi_margin:
        scope = "" if own_psi else " (host-wide)"
        return Level.WARN, f"PSI some avg10 {m.psi_some_avg10:.1f}%{scope} >= warn mark {p.warn_psi_some:g}%"
    return Level.OK, f"unreclaimable usage {_pct(r)} {where}, PSI some {m.psi_some_avg10:.1f}%"


def _stalled_at_limit(m: MemoryReading, p: Pressure, margin: float = 0.0) -> bool:
    """The kernel's own verdict where the page-cache arithmetic can be wrong: a scope at its
    limit whose tasks stall on IO is reclaiming pages that must be written first."""
    return bool(m.limit_bytes) and p.high_io_some > 0 and m.usage_ratio >= AT_LIMIT - margin \
        and m.io_some_avg10 >= p.high_io_some - margin * 100


@dataclass
class LevelState:
    """The level's memory across readings: which level holds, and when a reading last justified it."""

    level: Level = Level.OK
    justified_at: float = float("-inf")


@dataclass(frozen=True)
class Assessment:
    """How pressed the watched scope is, judged once per reading."""

    reading: MemoryReading
    level: Level             # the level answered: entered at once, left after hysteresis and dwell
    why: str
    now: Level               # what this reading alone justifies (no hysteresis, no dwell)
    sustained: Level         # what it justifies with the marks lowered by the hysteresis
    excess_bytes: int        # unreclaimable usage above the kill goal (high mark minus hysteresis)
    goal: float              # that goal, as a fraction of the limit
    thrashing: bool          # the scope's own PSI full at or above the high mark (never on v1), or
                             # stalled on IO at its limit: one answer is due even under the goal

    @property
    def pressed(self) -> bool:
        """Pressure is there in this reading, not only held by hysteresis or dwell."""
        return self.now >= Level.WARN



def _derived(m: MemoryReading, p: Pressure) -> dict:
    goal = p.high_usage - p.hysteresis
    excess = int(m.unreclaimable_bytes - goal * m.limit_bytes) if m.limit_bytes else 0
    thrashing = m.cgroup_version != 1 and 0 < p.high_psi_full <= m.psi_full_avg10 or _stalled_at_limit(m, p)
    return dict(excess_bytes=excess, goal=goal, thrashing=thrashing)


def recheck(m: MemoryReading, p: Pressure) -> Assessment:
    """A reading judged without the level's memory: for the re-check right before an act."""
    now, why = judge(m, p)
    sustained, held_why = judge(m, p, margin=p.hysteresis)
    return Assessment(m, sustained, held_why, now, sustained, **_derived(m, p))


def kill_still_needed(fresh: Assessment, p: Pressure) -> tuple[bool, str]:
    """Whether a kill planned a moment ago still stands, judged on `fresh` (read right before
    it), and why.

    Dropped only when the pressure is over: unreclaimable usage a whole hysteresis under the
    goal (the band a level must fall through to be left), and the level not held at high by
    the scope's own PSI or IO stalls. A reading that merely dips under the goal is not that: a
    previous kill's memory has just come back, and hogs allocating at full speed take it again
    within the cycle (a kill skipped at 84% against an 85% goal was followed 0.4 s later by a
    kernel OOM kill, VM run of 2026-12-01). Victims still exiting get no allowance: their
    memory is released at the kill where it can be (process_mrelease, act/process.py and
    kernel/feed.py), and what a victim's own exit is still freeing is not yet there for the
    allocators; that window is where the kernel's OOM killer acted in the VM, and a further
    kill, released at once, is what shortens it.
    """
    m = fresh.reading
    if not m.limit_bytes:
        return fresh.sustained >= Level.HIGH, fresh.why
    floor = fresh.goal - p.hysteresis
    usage = f"unreclaimable usage {_pct(m.unreclaimable_ratio)}"
    if m.unreclaimable_bytes >= floor * m.limit_bytes:
        return True, f"{usage}: not a hysteresis under the {_pct(fresh.goal)} goal ({_pct(floor)})"
    if fresh.sustained >= Level.HIGH:
        return True, f"{usage}, but {fresh.why}"          # the scope's own PSI, IO stalls
    return False, f"{usage} < {_pct(floor)}, a hysteresis under the {_pct(fresh.goal)} goal"


def assess(m: MemoryReading, p: Pressure, state: LevelState, ts: float) -> Assessment:
    """The cycle's judgment of `m`; moves `state` (the level entered, held or left)."""
    now, why = judge(m, p)
    sustained, held_why = judge(m, p, margin=p.hysteresis)
    if now >= state.level:
        state.level, state.justified_at = now, ts
        level = now
    elif sustained >= state.level:
        state.justified_at = ts
        level, why = state.level, f"{held_why} (within hysteresis)"
    elif ts - state.justified_at < p.min_dwell:
        level = state.level
        why = f"{why}; holding {level.name.lower()} for {p.min_dwell - (ts - state.justified_at):.1f}s more"
    else:
        state.level, state.justified_at = sustained, ts
        level = sustained
    return Assessment(m, level, why, now, sustained, **_derived(m, p))


def next_mark_bytes(m: MemoryReading, level: Level, p: Pressure) -> int | None:
    """Usage at which the level above `level` starts (the loop wakes there); None at the top."""
    if not m.limit_bytes:
        return None
    mark = {Level.OK: p.warn_usage, Level.WARN: p.high_usage, Level.HIGH: p.critical_usage}.get(level)
    return None if mark is None else int(mark * m.limit_bytes) + m.reclaimable_bytes - m.pending_bytes
