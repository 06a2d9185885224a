"""Application caches and poolers: one step smaller while pressure is there, one step back when
it has passed, paced like the database's caches (policy/caches.py).

When they answer is policy ([policy] caches_from, poolers_from): by default at warn, together
with the database's caches, a level before any kill (in one plan a kill comes first). A
pooler answers only pressure that comes from the database's sessions: fewer server
connections at once is no help against a hog. A cache that cannot give memory back (a
noeviction Redis, CONFIG SET refused) is left alone and said so, as an answer put off; so is
the next step of one whose last step is still taking effect (the adapter says why: `held`).
"""
from __future__ import annotations

from ..assess import Assessment
from ..settings import PolicyConfig, Pressure
from ..model import Action, ActionKind, CacheStats, Level, Snapshot
from .caches import no_room, pace
from .state import PolicyState

FROM = {"warn": Level.WARN, "high": Level.HIGH, "critical": Level.CRITICAL, "never": None}

Deferred = tuple[str, str]


def cache_name(c: CacheStats) -> str:
    return f"{c.kind} {c.name}"


def dwell_key(c: CacheStats) -> str:
    """Its key in PolicyState.cache_moved_at, apart from any database's name."""
    return f"{'pooler' if c.pooler else 'cache'}:{c.name}"


def app_caches(snap: Snapshot, a: Assessment, state: PolicyState, pres: Pressure, pol: PolicyConfig,
               sessions_press: bool) -> tuple[list[Action], list[Deferred]]:
    """Shrink and grow actions for [[caches]] and [[poolers]], and the answers put off now.
    `sessions_press`: the database's own sessions hold more of the memory than the hogs."""
    out: list[Action] = []
    deferred: list[Deferred] = []
    for c in snap.caches:
        if not c.up:
            continue
        start = FROM.get(pol.poolers_from if c.pooler else pol.caches_from)
        since = snap.ts - state.cache_moved_at.get(dwell_key(c), float("-inf"))
        due = start is not None and a.level >= start and a.pressed and (sessions_press or not c.pooler)
        if due and c.why_not and c.shrink_step == 0:
            deferred.append((cache_name(c), c.why_not))
            continue
        step = pace(a, due and not c.why_not, c.shrink_step, c.shrink_steps_max, since, pres)
        shrink, grow = step > 0, step < 0
        if not (shrink or grow):
            continue
        held = c.held if shrink else no_room(c.grow_bytes, c.shrink_step, c.shrink_steps_max, a, pres)
        if held:
            deferred.append((cache_name(c), held))
            continue
        state.cache_moved_at[dwell_key(c)] = snap.ts
        what = "pool sizes" if c.pooler else "memory limit"
        if shrink:
            out.append(Action(ActionKind.SHRINK_CACHE,
                              f"level {a.level.name.lower()}: lower its {what} to step {c.shrink_step + 1} of "
                              f"{c.shrink_steps_max}" + (" (the database's sessions hold the memory)" if c.pooler
                                                         else ""),
                              target=cache_name(c), cache=c.name, value=c.shrink_step + 1))
        else:
            out.append(Action(ActionKind.GROW_CACHE,
                              f"pressure has passed for {pres.min_dwell:g}s: raise its {what} back to step "
                              f"{c.shrink_step - 1} (0 = as configured)",
                              target=cache_name(c), cache=c.name, value=c.shrink_step - 1))
    return out, deferred

