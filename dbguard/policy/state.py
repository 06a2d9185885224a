"""What the graduated answers remember from one cycle to the next.

Owned by the daemon and handed to the policy each cycle: a SIGHUP or a newly discovered
database gives the policy a new configuration, never a new memory, so a reload cannot
reset the kill rate, a session's cancel→terminate escalation, the caches' dwell or the level.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..assess import LevelState
from ..model import ProcKey, Snapshot

SessionKey = tuple[str, int]      # (database name, session pid / connection id)
# A session that has to be ended again this soon after a cancel is terminated instead
# (policy/sessions.py): its client answered the cancel with the same again.
REPEAT_WINDOW = 60.0


@dataclass
class PolicyState:
    levels: LevelState = field(default_factory=LevelState)
    cache_moved_at: dict[str, float] = field(default_factory=dict)      # database -> last shrink/grow
    cancelled: dict[SessionKey, float] = field(default_factory=dict)    # session -> when cancelled
    cancelled_started: dict[SessionKey, float] = field(default_factory=dict)  # -> start of the statement cancelled
    terminated: set[SessionKey] = field(default_factory=set)
    last_cancel: dict[SessionKey, float] = field(default_factory=dict)  # session -> its latest cancel
    kill_times: deque = field(default_factory=lambda: deque(maxlen=10_000))   # one per kill round
    session_end_times: deque = field(default_factory=lambda: deque(maxlen=10_000))   # one per cancel round
    killed: dict[ProcKey, float] = field(default_factory=dict)          # planned kills, by identity
    scored: dict[ProcKey, tuple[int, int]] = field(default_factory=dict)  # oom_score_adj: (before us, ours)

    def forget(self, snap: Snapshot) -> None:
        """Drop memories of processes and sessions that are gone (pids get reused)."""
        procs = snap.procs
        for d in (self.scored, self.killed):
            for key in [key for key in d if (p := procs.get(key.pid)) is None or p.start_time != key.start_time]:
                del d[key]
        sessions = {(db.name, s.pid) for db in snap.databases if db.up for s in db.sessions}
        up = {db.name for db in snap.databases if db.up}
        for key in [key for key in self.cancelled if key[0] in up and key not in sessions]:
            del self.cancelled[key]
        for key in [key for key in self.cancelled_started if key not in self.cancelled]:
            del self.cancelled_started[key]
        self.terminated &= sessions | {k for k in self.terminated if k[0] not in up}
        for key in [key for key, t in self.last_cancel.items()
                    if snap.ts - t >= REPEAT_WINDOW or key[0] in up and key not in sessions]:
            del self.last_cancel[key]
