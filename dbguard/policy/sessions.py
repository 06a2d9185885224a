"""Database sessions: closing idle ones under pressure, and ending the one running away —
by SQL only (cancel first, terminate if it is still there after terminate_after)."""
from __future__ import annotations

from ..config import DatabaseConfig
from ..model import Action, ActionKind, Level, Snapshot
from .state import PolicyState
from .targets import MiB, session_name


def idle_sessions(snap: Snapshot, level: Level, state: PolicyState,
                  configs: dict[str, DatabaseConfig]) -> list[Action]:
    if level < Level.WARN:
        return []
    out = []
    for db in snap.databases:
        dc = configs.get(db.name)
        if not db.up or dc is None or dc.close_idle_after <= 0:
            continue
        for s in db.sessions:
            if s.state == "idle" and s.age_seconds >= dc.close_idle_after and \
                    (db.name, s.pid) not in state.terminated:
                state.terminated.add((db.name, s.pid))
                out.append(Action(ActionKind.TERMINATE_SESSION,
                                  f"level {level.name.lower()}: idle for {s.age_seconds:.0f}s "
                                  f"(close_idle_after {dc.close_idle_after:g}s)",
                                  pid=s.pid, target=session_name(db, s), database=db.name))
    return out


def runaway(snap: Snapshot, level: Level, state: PolicyState, configs: dict[str, DatabaseConfig]) -> list[Action]:
    if level < Level.HIGH:
        return []
    out = []
    for db in snap.databases:
        dc = configs.get(db.name)
        if not db.up or dc is None:
            continue
        active = [s for s in db.sessions if s.state != "idle" and s.memory_bytes >= dc.runaway_min_bytes
                  and (db.name, s.pid) not in state.terminated]
        if not active:
            continue
        s = max(active, key=lambda s: s.memory_bytes)
        key = (db.name, s.pid)
        holds = f"holds {s.memory_bytes // MiB} MiB, the most of any session (runaway_min_bytes " \
                f"{dc.runaway_min_bytes // MiB} MiB)"
        if key not in state.cancelled:
            state.cancelled[key] = snap.ts
            out.append(Action(ActionKind.CANCEL_QUERY, f"level {level.name.lower()}: session {holds}",
                              pid=s.pid, target=session_name(db, s), database=db.name))
        elif snap.ts - state.cancelled[key] >= dc.terminate_after:
            state.terminated.add(key)
            out.append(Action(ActionKind.TERMINATE_SESSION,
                              f"level {level.name.lower()}: still running {dc.terminate_after:g}s after "
                              f"cancel and {holds}", pid=s.pid, target=session_name(db, s), database=db.name))
    return out
