"""Database sessions: closing idle ones under pressure, and ending the one running away —
by SQL only (cancel first, terminate if it is still there after terminate_after)."""
from __future__ import annotations

import time

from ..assess import Assessment
from ..settings import DatabaseConfig, Kill
from ..databases import registry
from ..model import Action, ActionKind, Level, Snapshot
from .state import REPEAT_WINDOW, PolicyState
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


def end_sessions(snap: Snapshot, a: Assessment, state: PolicyState, configs: dict[str, DatabaseConfig],
                 k: Kill, excess: int, answered: bool = False) -> tuple[list[Action], int]:
    """At high: the database as its own hog. Cancel the largest active client sessions until the
    memory they hold covers `excess` (the part of the excess over the goal these sessions are
    answered for), all in this cycle; terminate those still running terminate_after seconds
    after their cancel, and (MySQL: the caps reach new sessions only) those to be ended again
    within REPEAT_WINDOW of their last cancel.
    Never a system session. Returns the actions and the bytes they free.

    Rate limits are the kill's (kill.min_interval between rounds, kill.max_per_minute), counted
    apart from kills. `answered`: another answer already acted this cycle (a thrashing scope
    justifies one answer under the goal, not one of each).
    """
    if a.level < Level.HIGH:
        return [], 0
    out: list[Action] = []
    freed = 0
    now = snap.ts
    # Only a running statement can be cancelled, and only a running one grows.
    open_sessions = [(db, s, configs[db.name]) for db in snap.databases if db.up and db.name in configs
                     for s in db.sessions if s.client and s.state == "active"]
    running = {(db.name, s.pid) for db, s, _ in open_sessions}
    up = {db.name for db in snap.databases if db.up}
    for key in [key for key in state.cancelled if key[0] in up and key not in running
                and key not in state.terminated]:
        del state.cancelled[key]             # its statement ended (idle, or idle in an aborted transaction)
    for db, s, dc in open_sessions:          # escalation: a cancel that did not end the statement
        key = (db.name, s.pid)
        if key in state.cancelled and _new_statement(s, now - state.cancelled[key], state.cancelled_started.get(key)):
            del state.cancelled[key]         # the cancel worked: this is the client's next statement
        elif key in state.cancelled and key not in state.terminated and now - state.cancelled[key] >= dc.terminate_after:
            state.terminated.add(key)
            freed += s.held_bytes
            out.append(Action(ActionKind.TERMINATE_SESSION,
                              f"level {a.level.name.lower()}: still running {dc.terminate_after:g}s after its cancel, "
                              f"{_holding(s, now)}", pid=s.pid, target=session_name(db, s), database=db.name))
    times = state.session_end_times
    if times and now - times[-1] < k.min_interval:
        return out, freed
    recent = sum(1 for t in times if now - t < 60)
    fresh = sorted((t for t in open_sessions if (t[0].name, t[1].pid) not in state.cancelled
                    and (t[0].name, t[1].pid) not in state.terminated
                    and t[1].held_bytes >= t[2].runaway_min_bytes), key=lambda t: -t[1].held_bytes)
    ended = 0
    for db, s, dc in fresh:
        if recent >= k.max_per_minute:
            break
        no_time_to_cap = _no_time_to_cap(a, db)
        if excess - freed <= 0 and (out or answered or not a.thrashing) and not no_time_to_cap:
            break
        key = (db.name, s.pid)
        freed += s.held_bytes
        recent += 1
        ended += 1
        why = f"level {a.level.name.lower()}: {_holding(s, now)}; the largest active session " \
              f"(runaway_min_bytes {dc.runaway_min_bytes // MiB} MiB)"
        since = now - state.last_cancel.get(key, float("-inf"))
        if no_time_to_cap:
            state.terminated.add(key)
            out.append(Action(ActionKind.TERMINATE_SESSION, f"{why}; at critical the session memory cap "
                              "reaches it only in a new connection", pid=s.pid, target=session_name(db, s),
                              database=db.name))
            continue
        if since < REPEAT_WINDOW and _caps_at_connect(db):
            # Its client answered the last cancel with the same again, and the shrunk settings
            # (the session memory cap) reach only sessions that start: a cancel would be
            # answered the same way; its client's next session starts under the cap.
            state.terminated.add(key)
            out.append(Action(ActionKind.TERMINATE_SESSION, f"{why}; cancelled {since:.0f}s ago and running "
                              "again", pid=s.pid, target=session_name(db, s), database=db.name))
            continue
        state.cancelled[key] = state.last_cancel[key] = now
        if s.started is not None:
            state.cancelled_started[key] = s.started
        out.append(Action(ActionKind.CANCEL_QUERY, why, pid=s.pid, target=session_name(db, s), database=db.name))
    if ended:
        times.append(now)
    return out, freed


# The server's clock and ours read a statement's start a little apart.
CLOCK_SLACK = 0.5
# Two reads of one statement's start (MariaDB works it out from now minus TIME_MS) differ by a
# millisecond or so; a statement sent after a cancel started at least that statement's run later.
STARTED_SLACK = 0.05


def _new_statement(s, since_cancel: float, cancelled_start: float | None) -> bool:
    """Whether the session runs another statement than the one cancelled (the client went on
    with its next statement: the cancel did its job). Where the server gives statement starts,
    by its own clock: another start; else it began less long ago than the cancel was sent."""
    if s.state != "active":
        return False
    if s.started is not None and cancelled_start is not None:
        return abs(s.started - cancelled_start) > STARTED_SLACK
    return s.age_seconds + CLOCK_SLACK < since_cancel


def _no_time_to_cap(a: Assessment, db) -> bool:
    """At critical, a server whose shrunk per-session settings reach only new connections
    (MariaDB/MySQL) gets every large running session ended by its connection, not one round
    per cycle: their clients send a cancelled statement again at once, in a session the cap
    does not reach, and the ones not yet ended keep growing while each round waits for the
    next cycle (the MariaDB session storm: one KILL QUERY per cycle, statements rerun, mariadbd
    OOM-killed 6-8 s after the limit). Their next connection starts under the cap."""
    return a.level >= Level.CRITICAL and _caps_at_connect(db)


def _caps_at_connect(db) -> bool:
    kind = registry.find(db.kind)
    return kind is not None and kind.caps_at_connect


def _holding(s, now: float) -> str:
    """What the audit record says of a session: its memory and when its statement started,
    never the statement's text (it may carry literals: names, secrets)."""
    temp = f" + {s.temp_bytes // MiB} MiB of temporary files" if s.temp_bytes else ""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - s.age_seconds))
    return f"holds {s.memory_bytes // MiB} MiB{temp}, statement started {started} (running {s.age_seconds:.0f}s)"
