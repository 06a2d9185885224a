"""Database caches: one step smaller while pressure is there, one step back when it has passed.

The adapters report facts (a resize still running, the server having shrunk its own cache);
the pacing is decided here: at most one step per min_dwell at warn (every cycle from high
up), one step at a time on the way back, and never a grow that would by itself bring back
the warn level (that would flap).
"""
from __future__ import annotations

from ..assess import Assessment
from ..settings import Pressure
from ..model import Action, ActionKind, DbStats, Level, Snapshot
from .state import PolicyState
from .targets import MiB, db_name, pct

# After the server shrank its own cache (MariaDB's innodb_buffer_pool_size_auto_min), growing
# it back at once would undo the server's own answer to the same pressure.
SELF_SHRINK_HOLDOFF = 60.0

Deferred = tuple[str, str]      # (target, why)


def caches(snap: Snapshot, a: Assessment, state: PolicyState, pres: Pressure) -> tuple[list[Action], list[Deferred]]:
    """Shrink and grow actions, and the answers put off now."""
    out: list[Action] = []
    deferred: list[Deferred] = []
    for db in snap.databases:
        if not db.up or db.shrink_steps_max == 0 and db.shrink_step == 0:
            continue
        since = snap.ts - state.cache_moved_at.get(db.name, float("-inf"))
        step = pace(a, a.level >= Level.WARN, db.shrink_step, db.shrink_steps_max, since, pres)
        shrink, grow = step > 0, step < 0
        if not (shrink or grow):
            continue
        why_not = _why_not_now(db, a, pres, grow)
        if why_not:
            deferred.append((db_name(db), why_not))
            continue
        state.cache_moved_at[db.name] = snap.ts
        if shrink:
            out.append(Action(ActionKind.SHRINK_CACHE,
                              f"level {a.level.name.lower()}: shrink caches to step {db.shrink_step + 1} "
                              f"of {db.shrink_steps_max}",
                              target=db_name(db), database=db.name, value=db.shrink_step + 1))
        else:
            out.append(Action(ActionKind.GROW_CACHE,
                              f"pressure has passed for {pres.min_dwell:g}s: grow caches back to step "
                              f"{db.shrink_step - 1} (0 = as configured)",
                              target=db_name(db), database=db.name, value=db.shrink_step - 1))
    return out, deferred


def _why_not_now(db: DbStats, a: Assessment, pres: Pressure, grow: bool) -> str:
    if db.resize_in_progress:
        return "a cache resize is still in progress; the next step waits for it"
    if not grow:
        return ""
    if db.self_shrunk_ago is not None and db.self_shrunk_ago < SELF_SHRINK_HOLDOFF:
        return (f"the server shrank its cache itself {db.self_shrunk_ago:.0f}s ago; not growing it back "
                f"before {SELF_SHRINK_HOLDOFF:.0f}s without that")
    return no_room(db.grow_bytes, db.shrink_step, db.shrink_steps_max, a, pres)


def pace(a: Assessment, due: bool, step: int, steps_max: int, since: float, pres: Pressure) -> int:
    """Pure pacing of anything shrunk in steps (database caches, application caches, poolers):
    1, one step smaller (while `due` and pressed: once per min_dwell at warn, every cycle from
    high up); -1, one step back (once pressure has passed for min_dwell); 0, stay."""
    if due and a.pressed and step < steps_max and (a.level >= Level.HIGH or since >= pres.min_dwell):
        return 1
    if a.level == Level.OK and step > 0 and since >= pres.min_dwell:
        return -1
    return 0


def no_room(grow_bytes: int, step: int, steps_max: int, a: Assessment, pres: Pressure) -> str:
    """Why growing `grow_bytes` now would bring the warn level back by itself ('' when it would not)."""
    m = a.reading
    room = pres.warn_usage - pres.hysteresis
    after = m.unreclaimable_ratio + grow_bytes / m.limit_bytes if m.limit_bytes else 0.0
    if not grow_bytes or after < room:
        return ""
    return (f"held at step {step} of {steps_max}: growing {grow_bytes // MiB} MiB would bring unreclaimable "
            f"usage to {pct(after)} of the limit, not under {pct(room)} (warn mark minus hysteresis)")
