"""Carry out a Plan: safety checks first, then the action, then its audit record and metric.

The safety rules are checked here again, against the processes as they are now, whatever
the policy said: never PID 1, a kernel thread, dbguard, or any process of a database
(a PostgreSQL backend killed by a signal takes every session down with it).
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from ..audit import AuditLog
from ..caches.base import AppCache
from ..databases import registry
from ..databases.base import Database
from ..model import Action, ActionKind, Level, Outcome, Plan, Proc, ProcKey, Role, Snapshot, Status
from ..sense.procfs import read_proc
from . import process

log = logging.getLogger("dbguard")


def refusal(a: Action, snap: Snapshot | None) -> str | None:
    """Why `a` must not be carried out, or None. Pure but for the fresh read of the target."""
    if a.kind not in (ActionKind.KILL, ActionKind.SET_OOM_SCORE_ADJ):
        return None
    if snap is None:
        return "a process action needs the snapshot it was decided on"
    if a.pid is None or a.start_time is None:
        return "no process identity (pid and start time) given"
    role = snap.roles.get(a.pid, Role.OTHER)
    if a.kind is ActionKind.SET_OOM_SCORE_ADJ and role.never_signalled:
        now = snap.procs.get(a.pid)
        if (role.is_database and (a.value or 0) > 0) or (now is not None and (a.value or 0) > now.oom_score_adj):
            return f"{role.value}: its score is never raised"
    if a.kind is ActionKind.KILL:
        if role.never_signalled:
            return f"{role.value} is never signalled"
        try:
            process.check_killable(a.pid)
        except process.Refused as e:
            return str(e)
        now = read_proc(a.pid)
        if now is None or now.start_time != a.start_time:
            return None      # gone or reused: process.kill() says so without touching it
        if now.kernel_thread:
            return "kernel thread"
        servers = {db.server_pid for db in snap.databases if db.server_pid}
        if now.ppid in servers:
            return "it is now a child of a database server (a new backend): never signalled"
        return _family_now(now, servers)
    return None


def _family_now(proc: Proc, servers: set[int]) -> str | None:
    """Why `proc`, read just now, is the database's (it runs a server executable or descends
    from a server or from a process running one, as classify would say), or None."""
    exes = registry.server_executables()
    p: Proc | None = proc
    for _ in range(64):
        if p is None or p.pid <= 1:
            return None
        if p.pid in servers or os.path.basename(p.exe) in exes:
            return ("it runs a database server executable" if p is proc else
                    f"it descends from database process {p.pid}") + ": never signalled"
        p = read_proc(p.ppid)
    return None


class Executor:
    """Carries out actions and says how each ended; the caller learns from the Outcomes."""

    def __init__(self, databases: dict[str, Database], audit: AuditLog,
                 observe: Callable[[Action, Outcome], None] | None = None,
                 recheck: Callable[[Action], tuple[bool, str]] | None = None, caches: dict[str, AppCache] | None = None):
        self.databases = databases
        self.caches = caches or {}
        self.audit = audit
        self.observe = observe or (lambda a, outcome: None)
        # A fresh judgment right before each kill (assess.kill_still_needed): whether it is
        # still needed, and why; the memory a previous kill of the same round released may
        # already be enough.
        self.recheck = recheck

    def execute(self, plan: Plan, snap: Snapshot) -> list[tuple[Action, Outcome]]:
        return [(a, self.one(a, plan.level, snap)) for a in plan.actions]

    def one(self, a: Action, level: Level, snap: Snapshot | None = None) -> Outcome:
        """Carry out `a` (a process action needs the snapshot it was decided on)."""
        return self.record(a, level, self._outcome(a, snap))

    def record(self, a: Action, level: Level, outcome: Outcome) -> Outcome:
        """The audit record and the metric of an act, from its outcome."""
        self.audit.action(a, level, outcome.result, outcome.ok, outcome=outcome.status.value)
        self.observe(a, outcome)
        return outcome

    def recover(self, name: str, level: Level) -> Outcome:
        """At start: put back settings a previous run left changed (it was killed half-way)."""
        a = Action(ActionKind.RESTORE_CACHE, "left changed by a previous run of dbguard", database=name,
                   target=f"database {name}")
        db = self.databases.get(name)
        outcome = Outcome.failed(f"no database named {name!r}") if db is None else db.recover()
        if outcome.status is Status.SKIPPED:
            return outcome          # nothing was left changed: nothing to say
        return self.record(a, level, outcome)

    def recover_cache(self, name: str, level: Level) -> Outcome:
        """At start: a cache or pooler limit a previous run left lowered (stepped back by the caller)."""
        cache = self.caches[name]
        a = Action(ActionKind.RESTORE_CACHE, "left changed by a previous run of dbguard", cache=name,
                   target=f"{cache.kind} {name}")
        outcome = cache.recover()
        return outcome if outcome.status is Status.SKIPPED else self.record(a, level, outcome)

    def _outcome(self, a: Action, snap: Snapshot | None) -> Outcome:
        why_not = refusal(a, snap)
        if why_not is not None:
            return Outcome.refused(why_not)
        if a.dry_run:
            return Outcome.dry_run()
        if a.kind is ActionKind.KILL and self.recheck is not None:
            needed, why = self.recheck(a)
            if not needed:
                return Outcome.skipped(f"pressure fell before the kill ({why})")
        log.debug("carrying out %s on %s", a.kind.value, a.target)
        try:
            return self._carry_out(a)
        except process.Refused as e:
            return Outcome.refused(str(e))
        except OSError as e:
            return Outcome.failed(e.strerror or str(e))

    def _carry_out(self, a: Action) -> Outcome:
        if a.kind is ActionKind.KILL:
            return process.kill(ProcKey(a.pid, a.start_time))
        if a.kind is ActionKind.SET_OOM_SCORE_ADJ:
            return process.set_oom_score_adj(ProcKey(a.pid, a.start_time), a.value)
        if a.cache is not None:
            cache = self.caches.get(a.cache)
            if cache is None:
                return Outcome.failed(f"no cache or pooler named {a.cache!r}")
            return cache.set_shrink_step(a.value)      # SHRINK_CACHE, GROW_CACHE, RESTORE_CACHE
        db = self.databases.get(a.database or "")
        if db is None:
            return Outcome.failed(f"no database named {a.database!r}")
        if a.kind is ActionKind.CANCEL_QUERY:
            return db.cancel(a.pid)
        if a.kind is ActionKind.TERMINATE_SESSION:
            return db.terminate(a.pid)
        return db.set_shrink_step(a.value)      # SHRINK_CACHE, GROW_CACHE, RESTORE_CACHE

    def restore_score(self, pid: int, value: int, why: str, level: Level, snap: Snapshot,
                      start_time: int | None = None) -> Outcome:
        """Put back a shielded process's oom_score_adj that someone raised (a BPF tamper event),
        through the same checks and pidfd-safe write as every other score. `start_time`: the
        process the event is about (the kernel's entry carries it); the write goes to that
        process only, never to a later holder of its pid."""
        proc = snap.procs.get(pid)
        if proc is None or (start_time and proc.start_time != start_time):
            a = Action(ActionKind.SET_OOM_SCORE_ADJ, why, pid=pid, target=f"pid {pid}", value=value)
            return self.record(a, level, Outcome.gone(f"pid {pid} not in this cycle's process table "
                                                      "(or now another process); score left as it is"))
        a = Action(ActionKind.SET_OOM_SCORE_ADJ, why, pid=pid, start_time=proc.start_time,
                   target=f"{proc.comm} (pid {pid})", value=value)
        return self.one(a, level, snap)
