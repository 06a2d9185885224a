"""Decide: from one Snapshot and its Assessment, the actions that answer the pressure.

Pure: no I/O and no clock of its own (time comes in the snapshot), so every rule here is
unit-tested without root, a kernel or a database, and `dbguard explain` shows exactly what
`dbguard run` would do. What the answers must remember across cycles lives in a
PolicyState the daemon owns and hands in (see state.py), so a new configuration never
wipes it. The policy learns from every act's Outcome (`learn`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from ..assess import Assessment
from ..settings import Config, DatabaseConfig
from ..model import Action, ActionKind, Outcome, Plan, Proc, ProcKey, Role, Snapshot, Status
from .appcaches import app_caches
from .caches import caches
from .kills import kills
from .scores import newborn, put_back, scores
from .sessions import end_sessions, idle_sessions
from .state import PolicyState
from .verdicts import Judge, KernelView, Verdict

__all__ = ["Policy", "PolicyState", "Verdict", "KernelView"]


@dataclass
class Policy:
    """The configuration and the host's facts the answers depend on; the memory is elsewhere."""

    cfg: Config
    dry_run: bool = False
    can_lower_scores: bool = False
    protected_uids: frozenset[int] = frozenset()
    watched_memcg: str | None = None     # "/a/b" relative memcg path; None: every process (host)
    rule_uids: dict[str, int] = field(default_factory=dict)
    pss_reader: Callable[[Proc], int | None] | None = None
    scope: str = ""                      # the watched scope's name, given to every action ("": the only one)
    judge: Judge = field(init=False)

    def __post_init__(self) -> None:
        self.judge = Judge(self.cfg, self.protected_uids, self.watched_memcg, self.rule_uids, self.pss_reader)

    @property
    def rules(self):
        return self.judge.rules

    @property
    def db_configs(self) -> dict[str, DatabaseConfig]:
        return {d.name: d for d in self.cfg.databases}

    # --- who is who (explain and the kernel maps read these too) -------------------------
    def verdicts(self, snap: Snapshot) -> dict[int, Verdict]:
        return self.judge.verdicts(snap)

    def ranked(self, snap: Snapshot) -> list[tuple[Proc, Verdict]]:
        return self.judge.ranked(snap)

    def candidates(self, snap: Snapshot) -> list[Proc]:
        """Kill candidates in kill order."""
        return [p for p, _ in self.judge.ranked(snap)]

    def kernel_view(self, snap: Snapshot) -> KernelView:
        return self.judge.kernel_view(snap)

    # --- deciding --------------------------------------------------------------------------
    def decide(self, snap: Snapshot, a: Assessment, state: PolicyState) -> Plan:
        cfg = self.cfg
        self.judge.level = a.level       # a cache server at its floor is a candidate at critical only
        shrink_grow, deferred = caches(snap, a, state, cfg.pressure)
        held, hogs = self._shares(snap)
        app, app_deferred = app_caches(snap, a, state, cfg.pressure, cfg.policy, held > hogs)
        deferred += app_deferred
        verdicts = self.verdicts(snap)
        # Carried out in this order: the scores and the relief (a kill, a cancel) act at once,
        # the resizes are SQL or cache round trips to servers that may themselves be stalled in
        # reclaim, so the relief never waits behind them.
        actions = (scores(snap, verdicts, state, cfg.protection, self.can_lower_scores, self.judge.changed)
                   + self._relief(snap, a, state)
                   + shrink_grow + app
                   + idle_sessions(snap, a.level, state, self.db_configs))
        actions = self._stamped(actions)
        state.forget(snap)
        return Plan(a.level, a.why, tuple(actions), tuple(deferred))

    def _relief(self, snap: Snapshot, a: Assessment, state: PolicyState) -> list[Action]:
        """Ending sessions and killing hogs share one excess over the goal. Whoever holds more
        of the memory is answered first: the database's own sessions when they hold more than
        the kill candidates (the database is its own hog), else the hogs; the other answer
        covers what is left."""
        ranked = self.ranked(snap)
        held, hogs = self._shares(snap, ranked)
        tiered = len(self.rules.tiers) > 1

        def sessions(excess: int, answered: bool):
            return end_sessions(snap, a, state, self.db_configs, self.cfg.kill, excess, answered)

        def hogs_(excess: int, answered: bool):
            return kills(snap, a, ranked, state, self.cfg.kill, tiered, excess, answered)

        first, second = (sessions, hogs_) if held > hogs else (hogs_, sessions)
        done, freed = first(a.excess_bytes, False)
        more, _ = second(a.excess_bytes - freed, bool(done))
        return done + more

    def _shares(self, snap: Snapshot, ranked: list | None = None) -> tuple[int, int]:
        """(memory the database's active client sessions hold, memory the kill candidates hold)."""
        hogs = sum(p.rss_bytes for p, _ in (ranked if ranked is not None else self.ranked(snap)))
        held = sum(s.held_bytes for db in snap.databases if db.up for s in db.sessions
                   if s.client and s.state == "active")
        return held, hogs

    def newborn(self, proc: Proc, self_pid: int, limit: int | None, state: PolicyState) -> Action | None:
        """The score of a process the kernel saw born in the scope (not a database process)."""
        a = newborn(proc, self.judge.verdict(proc, Role.OTHER, self_pid, limit), state, self.cfg.protection)
        return None if a is None else self._stamped([a])[0]

    def on_stop(self, snap: Snapshot, state: PolicyState, why: str = "dbguard stopping") -> list[Action]:
        """What to undo at stop, or when this scope is no longer watched: the scores dbguard
        raised (the caches go back by their own path)."""
        return self._stamped(put_back(snap, state, why))

    def _stamped(self, actions: list[Action]) -> list[Action]:
        """Marked dry run when it is one, and with the scope that decided them."""
        if not self.dry_run and not self.scope:
            return actions
        return [replace(x, dry_run=x.dry_run or self.dry_run, scope=self.scope) for x in actions]

    @staticmethod
    def learn(state: PolicyState, action: Action, outcome: Outcome) -> None:
        """What the policy takes from an act's outcome."""
        if action.kind is ActionKind.KILL and outcome.status is Status.SKIPPED \
                and action.pid is not None and action.start_time is not None:
            # Not needed after all (pressure fell first): a candidate like any other again,
            # so the next kill in its tier is not passed over.
            state.killed.pop(ProcKey(action.pid, action.start_time), None)
